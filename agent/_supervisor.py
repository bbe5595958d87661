"""The supervisor: owns the queue, asks the scheduler what starts, and runs each active run as one task.

::

    submit -> Queued --schedule--> Preparing -> Starting -> Running -> Finalizing -> Completed | Failed
                 |                     |            |          |
                 |  cancel             +------------+----------+--> CancelRequested -> Canceled
                 +--> Canceled                                      (cancel, or max_run_duration_seconds)

Each active run is a task in the supervisor's run nursery, with its own *kill scope*:
``cancel()`` and the run's duration limit cancel that scope, and the task then stops
the process (SIGTERM, grace, SIGKILL; shielded and bounded). Stopping the agent
cancels the nursery instead: the tasks return without touching the processes,
which keep running.

Recovery, at start: every run the store says is active gets its allocation back at
once (before the first scheduling pass, so nothing is handed out twice) and a task in
the run nursery that asks its executor to ``recover`` it, all in parallel: a live run is
supervised again (its deadline is ``started_at + max_run_duration_seconds``, its token's
hash is in the store), a run that ended meanwhile gets its real exit status, and only a
run whose executor finds nothing left is ``Failed`` with ``agent_lost``. Runs that had
not started are queued again.

Dependencies (``after``/``afterok`` in the spec) and arrays (``spec["array"]``, with its
``%N`` limit) are inputs to the pure scheduler: each pass tells it which queued runs
still wait for an unended run, and each array's limit. A queued ``afterok`` run whose
dependency ended without completing is canceled (``dependency_failed``) before the pass.
An executor with the ``arrays`` capability (Slurm) keeps the limit itself: the members a
pass starts are prepared one by one and started together as one job of its own
(``start_array``), then each is followed by its own task like any run; an array canceled
as a whole is stopped together (``stopping_together``: one ``scancel`` of the job array).

The supervisor knows no executor by name: ``executors`` maps target kinds to executors,
and ``kind_for`` says which one a run needs.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import secrets
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
import trio

from labrun.protocol import BadRequest, Conflict, Forbidden, _conda
from labrun.protocol._statuses import (
    ACTIVE, CANCEL_REQUESTED, CANCELED, COMPLETED, FAILED, FINALIZING, PREPARING, QUEUED, RUNNING, STARTING, TERMINAL,
)

from ._artifacts import artifact_path, note_in_log
from ._asuser import AsUserFailed, Credentials, acting_as, agent_dir, as_user, narrow_children
from ._config import AgentConfig
from ._environments import EnvironmentBuilder, PrepareFailed
from ._failure import failure_message
from ._faults import Faults
from ._interactive import InteractiveRuns, is_interactive
from ._launch import LaunchPlanner
from ._model import RunRecord
from ._notify import Notifier
from ._ready import ReadyCopies
from ._retention import remove_run_dir
from ._rundir import RunDir, runs_root
from ._scheduler import Active, Allocation, Capacity, Demand, Pending, schedule
from ._snapshot import ContentStore
from ._states import EVENT_TYPES, ExitResult, check_transition, outcome
from ._store import Store
from ._warnings import BACKGROUND_PROCESSES, KIND as WARNINGS, SNAPSHOT_NEAR_LIMITS
from .executors import (
    Ended, Executor, Handle, HandleError, LaunchSpec, Live, Lost, Preparation, StartFailed, kind_for,
)

log = structlog.get_logger("labrun.supervisor")

# Stopping a run waits this long beyond the grace period for SIGKILL to take effect.
KILL_WAIT_SECONDS = 5.0
# How long an executor may take to start a run (spawn the shim, create the container).
START_SECONDS = 120.0
# At start, how long an executor may take to say what became of one run (or to clean up orphans).
RECOVER_SECONDS = 60.0


@dataclass
class Owner:
    uid: int
    gid: int
    user: str
    groups: list[int]
    admin: bool = False

    def credentials(self) -> Credentials:
        return Credentials(self.uid, self.gid, tuple(self.groups))


@dataclass
class _ActiveRun:
    record: RunRecord
    allocation: Allocation
    kill_scope: trio.CancelScope
    ends_by: float
    cancel_reason: str | None = None
    token_hash: bytes = b""
    fail_error: str | None = None   # set by Run.fail() from outside: the run ends Failed with this error
    handle: Handle | None = None    # once started (or recovered)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Supervisor:
    def __init__(self, config: AgentConfig, store: Store, capacity: Capacity, executors: dict[str, Executor],
                 faults: Faults | None = None):
        self.config = config
        # A full or failing state disk: runs keep running, their status writes are retried, nothing new starts.
        self.faults = faults or Faults()
        self.faults.on_clear = self.wake
        self.store = store
        self.capacity = capacity
        self.executors = executors
        runs = runs_root(config.state_dir)
        agent_dir(runs, traversable=True)
        if narrow_children(runs):
            log.info("runs.narrowed", detail="run directories an older agent left readable to others are now 0700")
        self.queued: dict[str, RunRecord] = {}
        self._pendings: dict[str, tuple[RunRecord, Pending]] = {}   # the last pass's, by run id (see _pending)
        self.active: dict[str, _ActiveRun] = {}
        # Queued runs with dependencies (--after/--afterok): the only ones each pass checks for readiness.
        self.waiting_on_others: set[str] = set()
        self.changed = Notifier()
        self._wakeup = trio.Event()
        self._waiting_stale = False
        self._recovering = 0
        # Draining: no run starts (an admin's choice for upgrades and maintenance; kept across restarts).
        self.draining = bool(store.get_meta("draining", False))
        # The content store of snapshots; ``snapshots.release_snapshot(run_id)`` when a run is removed.
        self.snapshots = ContentStore(config.state_dir / "cas", store, config.snapshot.max_files,
                                      config.snapshot.max_bytes)
        self.interactive = InteractiveRuns(store, runs, self._transition, self.snapshots)
        self.launches = LaunchPlanner(config, store, capacity, EnvironmentBuilder(config.state_dir / "envs"),
                                      self.snapshots)
        self.ready = self.launches.ready = ReadyCopies(config.state_dir / "ready", self.snapshots,
                                                       failing=lambda: self.faults.disk_failing)

    def token_valid(self, run_id: str, token: str) -> bool:
        active = self.active.get(run_id)
        return active is not None and bool(active.token_hash) and secrets.compare_digest(active.token_hash,
                                                                                           token_hash(token))

    def _run_dir(self, run_id: str) -> RunDir:
        return RunDir.of(self.config.state_dir, run_id)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Recover what an earlier agent left, then schedule until cancelled (agent shutdown).

        Reports started once every active run is recovered (reattached, ended or lost).
        """
        async with trio.open_nursery() as nursery:
            await nursery.start(self.ready.run)
            await nursery.start(self.snapshots.small.run)
            self._recover(nursery)
            for record in self.store.runs_with_status([QUEUED]):
                if record.run_id in self.active:
                    continue   # in a cluster's queue, being recovered
                record.environ = None
                self._enqueue(record)
            ready = False
            while True:
                # Allocations are held again at once; new runs start once recovery is done, so nothing
                # an earlier agent left (an orphan of a run queued again) is running beside them.
                if self._recovering == 0:
                    self._schedule(nursery)
                    if not ready:
                        ready = True
                        task_status.started()
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                # A wake-up and the agent's shutdown can arrive together (a run task ending because it was
                # cancelled wakes us): start nothing then, or a freed slot would go to a second run.
                await trio.lowlevel.checkpoint_if_cancelled()

    def wake(self) -> None:
        self._wakeup.set()

    def set_draining(self, draining: bool) -> None:
        if draining == self.draining:
            return
        self.draining = draining
        self.store.set_meta("draining", draining)
        self.store.add_event("agent.draining" if draining else "agent.resumed", {"active": len(self.active)})
        log.info("agent.draining" if draining else "agent.resumed", active=len(self.active))
        self._waiting_stale = True
        self.changed.notify()
        self.wake()

    def _recover(self, nursery: trio.Nursery) -> None:
        """Hold every active run's allocation again and start a task recovering each (see the module doc)."""
        owned: dict[str, list[Handle]] = defaultdict(list)
        # A Queued run with a handle waits in a cluster's own queue (Slurm): it is recovered like an active one.
        waiting_elsewhere = [r for r in self.store.runs_with_status([QUEUED]) if r.handle is not None]
        for record in [*self.store.runs_with_status(ACTIVE), *waiting_elsewhere]:
            if is_interactive(record):
                # Its client's connection went with the old agent.
                self._transition(record, FAILED, ended_at=time.time(), reason="agent_lost",
                                 error="the agent stopped while this interactive run was open")
                continue
            if record.handle is None:
                # Never launched: nothing ran, so it simply goes back in the queue.
                if record.status == CANCEL_REQUESTED:
                    self._transition(record, CANCELED, ended_at=time.time(), reason="canceled")
                else:
                    self._transition(record, QUEUED, allocation=None, event_type="run.requeued")
                continue
            kind = kind_for(record.spec, self._target(record.spec))
            executor = self.executors.get(kind)
            handle, why = None, f"this agent has no {kind!r} executor"
            if executor is not None:
                try:
                    handle = executor.load_handle(record.handle)
                    owned[kind].append(handle)
                except HandleError as exc:
                    why = str(exc)
            allocation = Allocation.from_wire(record.allocation) if record.allocation else Allocation(0, None)
            run = _ActiveRun(record, allocation, trio.CancelScope(),
                             ends_by=(record.started_at or time.time()) + record.spec["max_run_duration_seconds"],
                             cancel_reason=record.reason if record.status == CANCEL_REQUESTED else None,
                             fail_error=(record.error if record.status == CANCEL_REQUESTED
                                         and record.reason == "failed" else None),
                             token_hash=self.store.token_hash(record.run_id) or b"")
            self.active[record.run_id] = run
            self._recovering += 1
            nursery.start_soon(self._recover_one, run, executor, handle, why, name=f"recover {record.run_id}")
        for kind, executor in self.executors.items():
            executor.recovering(owned.get(kind, []))   # (before any recover task runs)
            self._recovering += 1
            nursery.start_soon(self._reconcile, executor, owned.get(kind, []))

    async def _reconcile(self, executor: Executor, owned: list[Handle]) -> None:
        try:
            with trio.move_on_after(RECOVER_SECONDS) as scope:
                await executor.reconcile(owned)
            if scope.cancelled_caught:
                log.warning("executor.reconcile.timeout", kind=executor.kind, seconds=RECOVER_SECONDS)
        except Exception:
            log.exception("executor.reconcile.failed", kind=executor.kind)
        finally:
            self._recovering -= 1
            self.wake()

    # -- state changes -----------------------------------------------------------------

    async def _durably(self, write, *args, **kwargs):
        """A status write that must not be lost: retried through a full or failing disk (see ``_faults``)."""
        return await self.faults.retry("store", write, *args, **kwargs)

    def _transition(self, record: RunRecord, status: str, *, event_type: str | None = None, **changes) -> None:
        check_transition(record.status, status)
        data = {"status": status, "previous": record.status}
        for key in ("exit_code", "signal", "reason", "error"):
            if changes.get(key) is not None:
                data[key] = changes[key]
        self.store.update_run(record, event_type or EVENT_TYPES[status], data, status=status, **changes)
        if status in (COMPLETED, FAILED, CANCELED):
            # One canonical line per run; every transition is in the event log anyway.
            log.info("run.finished", run_id=record.run_id, user=record.user, status=status,
                     reason=changes.get("reason"), exit_code=record.exit_code, signal=record.signal)
        else:
            log.debug("run.status", run_id=record.run_id, status=status)
        self.changed.notify()

    # -- submit and cancel -------------------------------------------------------------

    async def submit(self, spec: dict, owner: Owner, submit_key: str | None = None) -> RunRecord:
        """Check the spec and its snapshot against this agent and queue the run (durably).

        ``submit_key``: the client's idempotency key, stored with the run in the same transaction.
        """
        return (await self._queue(spec, owner, None, submit_key))[0]

    async def submit_array(self, spec: dict, owner: Owner, array: dict, submit_key: str | None = None) -> list[RunRecord]:
        """Queue one run per index of ``array`` (``indices``, ``throttle``), sharing an array id: all or none."""
        return await self._queue(spec, owner, array, submit_key)

    async def _queue(self, spec: dict, owner: Owner, array: dict | None, submit_key: str | None) -> list[RunRecord]:
        self._check_features(spec, owner)
        parent_id = spec.pop("parent_run_id", None)
        if parent_id is not None:
            parent = self.store.get_run(parent_id)
            if parent is None:
                raise BadRequest(f"spec.parent_run_id: no run with id {parent_id!r}",
                                 details={"field": "spec.parent_run_id"})
            if parent.uid != owner.uid and not owner.admin:
                raise Forbidden(f"spec.parent_run_id: run {parent_id} belongs to {parent.user}")
        target = spec["compute_target"]
        if target != "local":
            configured = self.config.targets.get(target)
            if configured is None:
                known = ", ".join(["local", *sorted(self.config.targets)])
                raise BadRequest(f"spec.compute_target: unknown compute target {target!r} (this agent has: {known})",
                                 details={"field": "spec.compute_target"})
        demand = self._demand(spec)
        too_big = self.capacity.fits_ever(demand)
        if too_big:
            raise BadRequest(f"spec.resources: the run {too_big}; it could never start",
                             details={"field": "spec.resources"})
        self._resolve_dependencies(spec)

        snapshot = spec.pop("snapshot")
        entries, in_place = snapshot["files"], snapshot["in_place"]
        if entries is not None:
            tree = self.snapshots.check(owner.uid, entries)
            if any(os.path.normpath(e[0]) == "outputs" for e in entries):
                raise BadRequest("the source directory has an 'outputs' that is not a directory; labrun keeps the "
                                 "run's outputs there: rename it or add it to .labrunignore",
                                 details={"field": "spec.snapshot"})
            if spec["script"] is not None and os.path.normpath(spec["script"]) not in {e[0] for e in entries}:
                raise BadRequest(f"spec.script: {spec['script']!r} is not a file in the snapshot of the source "
                                 "directory; the script must be inside source_directory",
                                 details={"field": "spec.script"})
        else:
            await self._check_in_place(in_place, spec["script"], owner)
        spec["in_place"] = in_place
        near = self.snapshots.near_limits(entries) if entries is not None else None
        if near:
            # In the spec, so the warning is stored with the run, in the same transaction.
            spec[WARNINGS] = {SNAPSHOT_NEAR_LIMITS: near}

        now = time.time()
        run_id = f"{spec['experiment']}_{int(now)}_{uuid.uuid4().hex[:8]}"
        environ = spec.pop("environ")
        if array is None:
            members = [(run_id, spec)]
        else:
            # Members are <array id>_<index>, as Slurm names array tasks <job id>_<index>.
            members = [(f"{run_id}_{index}", {**spec, "array": {"id": run_id, "index": index, "size": len(array["indices"]),
                                                                   "throttle": array["throttle"]}})
                       for index in array["indices"]]
        created: list[str] = []
        try:
            # No await from the snapshot check to the last acquire (ContentStore.acquire's contract).
            records = []
            for member_id, member_spec in members:
                created.append(member_id)
                # Should the agent be killed before the row commits, its next start removes this directory:
                # nothing is in it but what is made here (``clean_orphans``).
                self._make_run_dir(member_id, owner, member_spec)
                if entries is not None:
                    self.snapshots.acquire(member_id, owner.uid, tree, entries)
                records.append(RunRecord(
                    run_id=member_id, order=0, experiment=spec["experiment"], number=0, uid=owner.uid,
                    gid=owner.gid, user=owner.user, status=QUEUED, spec=member_spec, environ=environ,
                    submitted_at=now,
                ))
            if array is None:
                self.store.add_run(records[0], EVENT_TYPES[QUEUED], submit_key=submit_key, parent_id=parent_id)
            else:
                self.store.add_array(records, EVENT_TYPES[QUEUED], submit_key=submit_key)
        except BaseException:
            with trio.CancelScope(shield=True):
                for member_id in created:
                    self.snapshots.release_snapshot(member_id)
                    try:
                        await trio.to_thread.run_sync(remove_run_dir, self._run_dir(member_id))
                    except OSError as exc:
                        log.warning("run.dir.remove_failed", run_id=member_id, error=str(exc))
            raise
        for record in records:
            log.debug("run.submitted", run_id=record.run_id, user=owner.user)
            record.environ = None   # stored; read back at launch, so ten thousand queued runs stay small
            self._enqueue(record)
        self.changed.notify()
        self.wake()
        return records

    def _make_run_dir(self, run_id: str, owner: Owner, spec: dict) -> None:
        creds = owner.credentials()
        layout = self._run_dir(run_id)
        # The run directory is its owner's (0700); what is in it is created with their rights.
        self._executor(spec).make_run_dir(self._target(spec), layout, creds)
        with acting_as(creds):
            # The snapshot itself is made when the run starts (Launch), from the contents stored now.
            layout.outputs_link.symlink_to(layout.outputs.relative_to(layout.root))
            layout.logs.mkdir()

    def _resolve_dependencies(self, spec: dict) -> None:
        """Expand array ids in ``after``/``afterok`` into their members; refuse unknown runs.

        A run can only wait for runs that exist when it is submitted, and its own id is new, so the
        dependency graph can never hold a cycle.
        """
        for key in ("after", "afterok"):
            resolved: list[str] = []
            for wanted in spec.get(key, []):
                members = self.store.array_members(wanted)
                if not members:
                    if wanted not in self.queued and wanted not in self.active and self.store.get_run(wanted) is None:
                        raise BadRequest(f"spec.{key}: no run or array with id {wanted!r}",
                                         details={"field": f"spec.{key}"})
                    members = [wanted]
                resolved += [m for m in members if m not in resolved]
            spec[key] = resolved

    def _enqueue(self, record: RunRecord) -> None:
        self.queued[record.run_id] = record
        if record.spec.get("after") or record.spec.get("afterok"):
            self.waiting_on_others.add(record.run_id)

    async def _check_in_place(self, directory: str, script: str | None, owner: Owner) -> None:
        """An in-place run works in ``directory``: its user must be able to enter and read it (checked as them)."""
        def check() -> str:
            os.close(os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            if not os.access(directory, os.R_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "Permission denied", directory)
            if script is not None and not os.path.isfile(os.path.join(directory, script)):
                return "no script"
            return ""

        try:
            problem = await trio.to_thread.run_sync(as_user, owner.credentials(), check)
        except AsUserFailed as exc:
            raise BadRequest(f"spec.snapshot.in_place: {owner.user} cannot use {directory!r} as the run's "
                             f"directory: {exc}", details={"field": "spec.snapshot.in_place"}) from None
        if problem:
            raise BadRequest(f"spec.script: {script!r} is not a file in {directory}", details={"field": "spec.script"})

    def _check_features(self, spec: dict, owner: Owner) -> None:
        """Refuse at submit what this machine cannot run, naming the field."""
        def refuse(field, message):
            raise BadRequest(f"spec.{field}: {message}", details={"field": f"spec.{field}"})

        target = self._target(spec)
        kind = kind_for(spec, target)
        executor = self.executors.get(kind)
        if executor is None:
            refuse("compute_target" if target is not None else "docker", f"this agent has no {kind} executor")
        executor.admit(spec, target)
        environment = spec.get("environment")
        if environment is not None and environment["python"].get("conda_specification"):
            # Conda specifications are built with pip (see _environments): one that does not parse never builds.
            try:
                _conda.parse(environment["python"]["conda_specification"])
            except ValueError as exc:
                refuse("environment.python.conda_specification", f"not a conda specification: {exc}")
        resume = spec.get("resume_from")
        if resume is not None:
            if resume["run_id"] is not None:
                source = self.store.get_run(resume["run_id"])
                if source is None:
                    refuse("resume_from", f"no run with id {resume['run_id']!r}")
                if source.uid != owner.uid and not owner.admin:
                    raise Forbidden(f"spec.resume_from: run {source.run_id} belongs to {source.user}")
                path = artifact_path(self._run_dir(source.run_id), resume["path"], "spec.resume_from.path")
                with acting_as(owner.credentials()):
                    found = os.path.lexists(path)
                if not found:
                    refuse("resume_from", f"run {source.run_id} has no {resume['path']!r}")
            elif not os.path.isabs(resume["path"]):
                refuse("resume_from", f"a local path must be absolute, got {resume['path']!r}")

    def _target(self, spec: dict):
        return self.config.targets.get(spec.get("compute_target", "local"))

    def cancel(self, record: RunRecord, error: str | None = None) -> RunRecord:
        """Cancel a queued run at once, or ask an active run's task to stop it.

        With ``error`` (``Run.fail()`` from outside the run) the run ends ``Failed`` with that error instead.
        """
        if is_interactive(record):
            return self.interactive.finish(record, FAILED if error else CANCELED, error=error)
        if record.run_id in self.queued:
            record = self.queued.pop(record.run_id)
            self.waiting_on_others.discard(record.run_id)
            record.waiting = None
            if error:
                self._transition(record, FAILED, ended_at=time.time(), reason="failed", error=error)
            else:
                self._transition(record, CANCELED, ended_at=time.time(), reason="canceled")
            self.wake()
            return record
        active = self.active.get(record.run_id)
        if active is None:
            if record.status == CANCELED:
                return record   # canceling twice is harmless
            raise Conflict(f"run {record.run_id} has already ended ({record.status})")
        if active.cancel_reason is None and active.record.status != FINALIZING:
            active.cancel_reason = "failed" if error else "canceled"
            active.fail_error = error
            self._transition(active.record, CANCEL_REQUESTED, reason=active.cancel_reason, error=error)
            active.kill_scope.cancel()
        return active.record

    def cancel_array(self, records: list[RunRecord]) -> list[RunRecord]:
        """Cancel an array's runs that have not ended: the queued ones first (none then takes a slot a stopped
        one frees), and the others stopped together where their executor can (Slurm: one ``scancel``)."""
        records = sorted((r for r in records if r.status not in TERMINAL), key=lambda r: r.run_id not in self.queued)
        together: dict[str, list[Handle]] = defaultdict(list)
        for record in records:
            active = self.active.get(record.run_id)
            # The runs cancel() stops: started, and neither being canceled already nor ending by themselves.
            if active is not None and active.handle is not None and active.cancel_reason is None \
                    and active.record.status != FINALIZING:
                together[kind_for(record.spec, self._target(record.spec))].append(active.handle)
        for kind, handles in together.items():
            self.executors[kind].stopping_together(handles)
        return [self.cancel(record) for record in records]

    def live_record(self, run_id: str) -> RunRecord | None:
        """The in-memory record of a queued or active run (it carries ``waiting``)."""
        if run_id in self.queued:
            if self._waiting_stale:
                self._decide()   # saturated, so this only explains the queue: nothing starts
            return self.queued[run_id]
        active = self.active.get(run_id)
        return active.record if active else None

    # -- scheduling --------------------------------------------------------------------

    def _demand(self, spec: dict) -> Demand:
        """What a run takes from this machine: nothing when its executor runs it elsewhere (a cluster)."""
        executor = self.executors.get(kind_for(spec, self._target(spec)))
        if executor is not None and not executor.capabilities.counted_locally:
            return Demand(cpus=0, memory=None, gpus=0)
        return Demand(**spec["resources"])

    def _saturated(self) -> bool:
        """True when no queued run can start: every run needs a CPU, and none is free (or the run cap is hit)."""
        local = [a for a in self.active.values() if a.allocation.cpus]   # a cluster's runs take no local CPU
        if not (self.capacity.max_runs and len(local) >= self.capacity.max_runs) and \
                sum(a.allocation.cpus for a in local) < self.capacity.cpus:
            return False
        # Runs that take no local CPU may still start; only agents with a target of such an executor (a cluster:
        # only a named target leads to one) pay for this scan of the queue.
        if any(not self.executors[t.kind].capabilities.counted_locally
               for t in self.config.targets.values() if t.kind in self.executors):
            return all(self._demand(r.spec).cpus for r in self.queued.values())
        return True

    def _unmet(self, record: RunRecord) -> tuple[str, ...]:
        """The runs ``record`` waits for that have not ended (every unended run is queued or active)."""
        if record.run_id not in self.waiting_on_others:
            return ()
        return tuple(r for r in (*record.spec["after"], *record.spec["afterok"])
                     if r in self.queued or r in self.active)

    def _cancel_failed_dependents(self) -> None:
        """``--afterok`` runs whose dependency ended without completing can never start: cancel them."""
        for run_id in sorted(self.waiting_on_others):
            record = self.queued[run_id]
            ended = [r for r in record.spec["afterok"] if r not in self.queued and r not in self.active]
            failed = sorted(r for r, status in self.store.statuses_of(ended).items() if status != COMPLETED)
            if failed:
                self.queued.pop(run_id)
                self.waiting_on_others.discard(run_id)
                record.waiting = None
                self._transition(record, CANCELED, ended_at=time.time(), reason="dependency_failed",
                                 error=f"canceled: run {failed[0]} did not complete (--afterok)")
                self.wake()   # its own --afterok dependents go next

    def _array_of(self, spec: dict) -> str | None:
        return (spec.get("array") or {}).get("id")

    def _pending(self, record: RunRecord, previous: dict) -> Pending:
        """The scheduler's view of a queued run: kept from the last pass unless it may have changed (its
        dependencies), so a pass over a long queue does not build it again for every run."""
        kept = previous.get(record.run_id)
        if kept is not None and kept[0] is record and kept[1].priority == record.spec["priority"] \
                and record.run_id not in self.waiting_on_others:
            return kept[1]
        return Pending(run_id=record.run_id, user=record.user, priority=record.spec["priority"], order=record.order,
                       demand=self._demand(record.spec), duration=record.spec["max_run_duration_seconds"],
                       blocked_by=self._unmet(record), array=self._array_of(record.spec))

    def _arrays_native(self, spec: dict) -> bool:
        """Whether the run's executor starts an array as one job of its own, and keeps its limit itself."""
        executor = self.executors.get(kind_for(spec, self._target(spec)))
        return executor is not None and executor.capabilities.arrays

    def _decide(self, explain: bool = True):
        now = time.time()
        pending, limits, previous, self._pendings = [], {}, self._pendings, {}
        for r in self.queued.values():
            p = self._pending(r, previous)
            self._pendings[r.run_id] = (r, p)
            if p.array is not None and not self._arrays_native(r.spec):
                limits[p.array] = r.spec["array"]["throttle"]
            pending.append(p)
        active = [Active(a.record.run_id, a.record.user, a.allocation, a.ends_by, self._array_of(a.record.spec))
                  for a in self.active.values()]
        decision = schedule(pending, active, self.capacity, now, limits, explain=explain)
        if not decision.explained:
            # A full machine after this pass's starts: why the others wait is worked out when someone looks.
            self._waiting_stale = True
            return decision, now
        for run_id, (reason, position) in decision.waiting.items():
            record = self.queued[run_id]
            record.waiting = {"reason": "draining" if self.draining else reason, "position": position}
            if reason == "dependency":
                record.waiting["on"] = list(self._unmet(record))
        if self.draining:
            for start in decision.starts:
                self.queued[start.run_id].waiting = {"reason": "draining", "position": 0}
        self._waiting_stale = False
        return decision, now

    def _schedule(self, nursery: trio.Nursery) -> None:
        if self.waiting_on_others:
            self._cancel_failed_dependents()
        if not self.queued or self.faults.disk_failing:
            return   # with a failing state disk, queued runs wait; clearing the fault wakes the scheduler
        if self._saturated() or self.draining:
            # Nothing can start, so skip the pass (a full queue makes it O(n) per submit); the waiting
            # reasons are worked out when someone looks at the queue.
            self._waiting_stale = True
            return
        decision, now = self._decide(explain=False)
        together: dict[str, list[_ActiveRun]] = defaultdict(list)   # array id -> members started as one job
        for start in decision.starts:
            record = self.queued.pop(start.run_id)
            self.waiting_on_others.discard(start.run_id)
            record.waiting = None
            run = _ActiveRun(record, start.allocation, trio.CancelScope(),
                             ends_by=now + record.spec["max_run_duration_seconds"])
            self.active[record.run_id] = run
            # Here, not in the task: the events then show the order in which the scheduler took the runs.
            self._transition(record, PREPARING, allocation=start.allocation.to_wire())
            array = self._array_of(record.spec)
            if array is not None and self._arrays_native(record.spec):
                together[array].append(run)
            else:
                nursery.start_soon(self._run_one, run, name=f"run {record.run_id}")
        for array, runs in together.items():
            nursery.start_soon(self._run_array, runs, name=f"array {array}")

    # -- one run -----------------------------------------------------------------------

    def _advance(self, run: _ActiveRun, status: str, **changes) -> None:
        """Move an active run forward unless a cancel got there first."""
        if run.cancel_reason is None:
            self._transition(run.record, status, **changes)
        elif changes:
            self.store.update_run(run.record, None, **changes)

    def _executor(self, spec: dict) -> Executor:
        return self.executors[kind_for(spec, self._target(spec))]

    async def _run_one(self, run: _ActiveRun, executor: Executor | None = None, handle: Handle | None = None) -> None:
        """A run's task: launch it (unless ``handle`` says it runs already), wait for it, stop it when killed."""
        record = run.record
        executor = executor or self._executor(record.spec)
        result: ExitResult | None = None
        try:
            with run.kill_scope:
                if handle is None:
                    handle = await self._launch(run, executor)
                    if handle is None:
                        return   # it failed to start, and is finished
                run.handle = handle
                if executor.capabilities.own_queue:
                    result = await executor.wait(handle, partial(self._progress, run))
                else:
                    result = await executor.wait(handle)
            if run.kill_scope.cancelled_caught:
                if run.cancel_reason is None:
                    run.cancel_reason = "max_run_duration_exceeded"
                    await self._durably(self._transition, record, CANCEL_REQUESTED, reason=run.cancel_reason)
                if handle is not None:
                    with trio.move_on_after(self.config.stop_grace_seconds + KILL_WAIT_SECONDS, shield=True):
                        await self.store.durable()
                        await executor.stop(handle, self.config.stop_grace_seconds)
                        result = await executor.wait(handle)
            await self._durably(self._finish, run, result)
        except Exception as exc:
            # A bug or an I/O error of the agent: the run fails, the agent goes on.
            log.exception("run.supervise.failed", run_id=record.run_id)
            if record.status not in TERMINAL:
                await self._durably(self._fail, run, "agent_error", f"agent error: {exc}")
        finally:
            del self.active[record.run_id]
            self.wake()

    async def _launch(self, run: _ActiveRun, executor: Executor) -> Handle | None:
        """Preparing and Starting: returns the started run's handle, or None once a failure is recorded."""
        try:
            return await self._launch_prepared(run, executor)
        finally:
            self.ready.go()   # the copies this start wanted are made now, no longer competing with it

    async def _launch_prepared(self, run: _ActiveRun, executor: Executor) -> Handle | None:
        launch = await self._prepare(run, executor)
        if launch is None:
            return None
        # A process starts only for a run whose state is saved: committed here, then handed over at once.
        self.store.commit_now()
        await self.store.durable()
        # Shielded: a cancel or time limit arriving while the executor starts the run must not lose the
        # handle of processes that already exist. The cancel then takes effect at the wait that follows.
        with trio.move_on_after(START_SECONDS, shield=True) as starting:
            try:
                handle = await executor.start(launch)
            except StartFailed as exc:
                await self._fail_to_start(run, launch.ranks[0].log_path, exc.reason, str(exc))
                return None
        if starting.cancelled_caught:
            await self._fail_to_start(run, launch.ranks[0].log_path, "start_failed",
                                      f"the run did not start within {START_SECONDS:.0f} seconds")
            return None
        await self._started(run, executor, handle)
        return handle

    async def _prepare(self, run: _ActiveRun, executor: Executor) -> LaunchSpec | None:
        """Preparing: the run's launch, or None once its failure is recorded."""
        record = run.record
        run_dir = self._run_dir(record.run_id)
        token = secrets.token_urlsafe(24)
        run.token_hash = token_hash(token)
        self.store.set_token_hash(record.run_id, run.token_hash)
        try:
            launch = await executor.prepare(Preparation(record, run.allocation, token, run_dir,
                                                        self._target(record.spec), self.launches))
        except PrepareFailed as exc:
            await self._fail_to_start(run, run_dir.std_log, exc.reason, str(exc))
            return None
        if not executor.capabilities.own_queue:
            await self._durably(self._advance, run, STARTING)
        return launch

    async def _started(self, run: _ActiveRun, executor: Executor, handle: Handle) -> None:
        """Record the started run's handle: Running, or Queued in the executor's own queue."""
        if executor.capabilities.own_queue:
            # The run now waits in the cluster's queue; it is Running (and its time limit counts) once it runs.
            run.ends_by = math.inf
            await self._durably(self._advance, run, QUEUED, handle=handle.to_store())
            return
        duration = run.record.spec["max_run_duration_seconds"]
        run.ends_by = time.time() + duration
        run.kill_scope.deadline = trio.current_time() + duration
        await self._durably(self._advance, run, RUNNING, started_at=time.time(), pid=handle.pid,
                            handle=handle.to_store())

    async def _run_array(self, runs: list[_ActiveRun], executor: Executor | None = None) -> None:
        """Members of one array that their executor starts as one job (a Slurm job array): prepared one by
        one, started together, then each followed by its own task (``_run_one``) as any run is."""
        executor = executor or self._executor(runs[0].record.spec)
        followed: set[str] = set()
        try:
            prepared: list[tuple[_ActiveRun, LaunchSpec]] = []
            for run in runs:
                try:
                    launch = await self._prepare(run, executor)
                except Exception as exc:
                    log.exception("run.supervise.failed", run_id=run.record.run_id)
                    await self._durably(self._fail, run, "agent_error", f"agent error: {exc}")
                    continue
                if launch is not None:
                    prepared.append((run, launch))
            for run, _ in prepared:
                if run.cancel_reason is not None:
                    await self._durably(self._finish, run, None)   # canceled while its array was prepared
            prepared = [(run, launch) for run, launch in prepared if run.cancel_reason is None]
            if not prepared:
                return
            await self.store.durable()
            with trio.move_on_after(START_SECONDS, shield=True) as starting:
                try:
                    handles = await executor.start_array([launch for _, launch in prepared],
                                                         prepared[0][0].record.spec["array"]["throttle"])
                except StartFailed as exc:
                    for run, launch in prepared:
                        await self._fail_to_start(run, launch.ranks[0].log_path, exc.reason, str(exc))
                    return
                except Exception as exc:
                    log.exception("array.start.failed", run_ids=[run.record.run_id for run, _ in prepared])
                    for run, _ in prepared:
                        await self._durably(self._fail, run, "agent_error", f"agent error: {exc}")
                    return
            if starting.cancelled_caught:
                for run, launch in prepared:
                    await self._fail_to_start(run, launch.ranks[0].log_path, "start_failed",
                                              f"the run did not start within {START_SECONDS:.0f} seconds")
                return
            for (run, _), handle in zip(prepared, handles):
                await self._started(run, executor, handle)
            async with trio.open_nursery() as nursery:
                for (run, _), handle in zip(prepared, handles):
                    followed.add(run.record.run_id)
                    nursery.start_soon(self._run_one, run, executor, handle, name=f"run {run.record.run_id}")
        finally:
            for run in runs:
                if run.record.run_id not in followed:
                    del self.active[run.record.run_id]
            self.wake()

    async def _fail_to_start(self, run: _ActiveRun, log_path: Path, reason: str, error: str) -> None:
        note_in_log(run.record, log_path, f"labrun: {error}\n")
        await self._durably(self._fail, run, reason, error)

    async def _recover_one(self, run: _ActiveRun, executor: Executor | None, handle: Handle | None,
                           why: str) -> None:
        """Find out what became of a run an earlier agent started, then supervise it if it still runs."""
        record = run.record
        try:
            if record.status == FINALIZING and (record.exit_code is not None or record.signal is not None):
                # It had ended, and the agent stopped before recording how: the exit is in the store.
                state = Ended(ExitResult(exit_code=record.exit_code, signal=record.signal))
            elif executor is None or handle is None:
                state = Lost(why)
            else:
                # Bounded: new runs wait for recovery. An executor that cannot tell in time (a Docker engine
                # that does not answer) keeps its run, watched as if live, rather than declaring it lost.
                state = Live(handle)
                with trio.move_on_after(RECOVER_SECONDS):
                    state = await executor.recover(handle)
        except Exception as exc:
            log.exception("run.recover.failed", run_id=record.run_id)
            state = Lost(f"recovering it failed: {exc}")
        finally:
            self._recovering -= 1
            self.wake()
        if isinstance(state, Live):
            log.info("run.reattached", run_id=record.run_id, status=record.status)
            if record.status in (RUNNING, FINALIZING) or not executor.capabilities.own_queue:
                remaining = run.ends_by - time.time()
                run.kill_scope.deadline = trio.current_time() + max(0.0, remaining)
            else:
                run.ends_by = math.inf   # still in the cluster's queue: its time limit counts once it runs
            if run.cancel_reason is not None:
                run.kill_scope.cancel()   # the cancel was asked for before the restart: carry it out
            await self._run_one(run, executor, state.handle)
            return
        try:
            if isinstance(state, Ended):
                await self._durably(self._finish, run, state.result)
            else:
                log.warning("run.lost", run_id=record.run_id, status=record.status, why=state.why)
                if run.cancel_reason is not None:
                    await self._durably(self._finish, run, None)
                else:
                    await self._durably(self._fail, run, "agent_lost",
                                        f"the run's process is gone and left no exit status: {state.why}")
        finally:
            del self.active[record.run_id]
            self.wake()

    def _fail(self, run: _ActiveRun, reason: str, error: str) -> None:
        self._transition(run.record, FAILED, ended_at=time.time(), reason=reason, error=error)
        self.store.set_token_hash(run.record.run_id, None)

    def _finish(self, run: _ActiveRun, result: ExitResult | None) -> None:
        """Record how the run ended: the status, reason and message come from ``outcome``."""
        record = run.record
        exit_fields = {}
        if result is not None:
            exit_fields = {"exit_code": result.exit_code, "signal": result.signal}
        ended = outcome(result, cancel_reason=run.cancel_reason, memory=run.allocation.memory,
                        fail_error=run.fail_error)
        if result is not None and result.left_behind:
            # Before the end is recorded: whoever sees the run ended sees this too (and a retry writes it again).
            self.store.set_labels(record.run_id, WARNINGS, {BACKGROUND_PROCESSES: (
                f"Run: {result.left_behind} background process(es) of the run were still running when its program "
                "ended; labrun ended them (SIGTERM, then SIGKILL), since a run ends with all its processes. "
                "Wait for them in the program if their work matters.")})
        error = ended.error
        if ended.reason == "exit_code":
            # The error a user sees is the exception their script raised, when its traceback is in the logs.
            error = failure_message(self._run_dir(record.run_id).root) or error
        if result is not None and result.started:
            self._walk(run, RUNNING)   # a cluster run that ended between two looks at it
        if ended.status == CANCELED and record.status not in (QUEUED, CANCEL_REQUESTED):
            # Canceled by the cluster (Slurm's scancel or time limit): the same two steps as a cancel here.
            self._transition(record, CANCEL_REQUESTED, reason=ended.reason)
        if record.status == RUNNING and ended.status != CANCELED:
            self._transition(record, FINALIZING, **exit_fields)
        self._transition(record, ended.status, ended_at=time.time(), reason=ended.reason, error=error,
                         **exit_fields)
        self.store.set_token_hash(record.run_id, None)

    # -- runs in a cluster's own queue (Slurm) ------------------------------------------

    async def _progress(self, run: _ActiveRun, status: str, waiting: dict | None) -> None:
        """The cluster reports a new state of the run, as a labrun status, and while Queued why it waits there."""
        record = run.record
        if status == QUEUED:
            record.waiting = {"position": None, **(waiting or {"reason": "queued elsewhere"})}
            if record.status in (STARTING, RUNNING) and run.cancel_reason is None:   # preempted or requeued
                await self._durably(self._transition, record, QUEUED, event_type="run.requeued")
                run.ends_by, run.kill_scope.deadline = math.inf, math.inf
            self.changed.notify()
            return
        record.waiting = None
        await self._durably(self._walk, run, status)

    def _walk(self, run: _ActiveRun, status: str) -> None:
        """Through each status a local run passes on its way to ``status``: Starting, Running, Finalizing."""
        steps = [STARTING, RUNNING, FINALIZING]
        if status not in steps or run.cancel_reason is not None:
            return   # an end is _finish's to record
        reached = steps.index(run.record.status) if run.record.status in steps else -1
        for step in steps[reached + 1: steps.index(status) + 1]:
            if step == RUNNING:
                # The time limit counts from here, as for a local run.
                now = time.time()
                run.ends_by = now + run.record.spec["max_run_duration_seconds"]
                run.kill_scope.deadline = trio.current_time() + run.record.spec["max_run_duration_seconds"]
                self._transition(run.record, RUNNING, started_at=now)
            else:
                self._transition(run.record, step)
