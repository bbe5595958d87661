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
which keep running. A restarted agent cannot reattach to them yet: it ends them
(``abandon``) and marks them ``Failed`` with the reason ``agent_lost``; runs that had
not started are queued again.

Dependencies (``after``/``afterok`` in the spec) and arrays (``spec["array"]``, with its
``%N`` limit) are inputs to the pure scheduler: each pass tells it which queued runs
still wait for an unended run, and each array's limit. A queued ``afterok`` run whose
dependency ended without completing is canceled (``dependency_failed``) before the pass.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import signal as signals
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import structlog
import trio

from labrun.protocol import BadRequest, Conflict, Forbidden, _conda, format_memory
from labrun.protocol._statuses import (
    ACTIVE, CANCEL_REQUESTED, CANCELED, COMPLETED, FAILED, FINALIZING, PREPARING, QUEUED, RUNNING, STARTING,
)

from ._artifacts import artifact_path, note_in_log
from ._asuser import AsUserFailed, Credentials, acting_as, agent_dir, as_user, make_private_dir, narrow_children
from ._config import AgentConfig
from ._docker_args import translate_arguments
from ._environments import EnvironmentBuilder, PrepareFailed
from ._executor import ExitResult, StartFailed
from ._failure import failure_message
from ._interactive import InteractiveRuns, is_interactive
from ._launch import LaunchPlanner
from ._model import RunRecord
from ._notify import Notifier
from ._scheduler import Active, Allocation, Capacity, Demand, Pending, schedule
from ._snapshot import ContentStore
from ._states import EVENT_TYPES, check_transition
from ._store import Store

log = structlog.get_logger("labrun.supervisor")

# Stopping a run waits this long beyond the grace period for SIGKILL to take effect.
KILL_WAIT_SECONDS = 5.0


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
    token: str = ""
    fail_error: str | None = None   # set by Run.fail() from outside: the run ends Failed with this error


class Supervisor:
    def __init__(self, config: AgentConfig, store: Store, capacity: Capacity, executors: dict):
        self.config = config
        self.store = store
        self.capacity = capacity
        self.executors = executors
        self.runs_dir = config.state_dir / "runs"
        agent_dir(self.runs_dir, traversable=True)
        if narrow_children(self.runs_dir):
            log.info("runs.narrowed", detail="run directories an older agent left readable to others are now 0700")
        self.queued: dict[str, RunRecord] = {}
        self.active: dict[str, _ActiveRun] = {}
        # Queued runs with dependencies (--after/--afterok): the only ones each pass checks for readiness.
        self.waiting_on_others: set[str] = set()
        self.changed = Notifier()
        self._wakeup = trio.Event()
        self._waiting_stale = False
        self.interactive = InteractiveRuns(store, self.runs_dir, self._transition)
        # The content store of snapshots; ``snapshots.release_snapshot(run_id)`` when a run is removed.
        self.snapshots = ContentStore(config.state_dir / "cas", store, config.snapshot.max_files,
                                      config.snapshot.max_bytes)
        self.launches = LaunchPlanner(config, store, capacity, EnvironmentBuilder(config.state_dir / "envs"),
                                      self._executor_name, self._image, self.snapshots)

    def token_valid(self, run_id: str, token: str) -> bool:
        active = self.active.get(run_id)
        return active is not None and secrets.compare_digest(active.token, token)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Recover what an earlier agent left, then schedule until cancelled (agent shutdown)."""
        await self._recover()
        for record in self.store.runs_with_status([QUEUED]):
            record.environ = None
            self._enqueue(record)
        async with trio.open_nursery() as nursery:
            task_status.started()
            while True:
                self._schedule(nursery)
                await self._wakeup.wait()
                self._wakeup = trio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    async def _recover(self) -> None:
        for record in self.store.runs_with_status(ACTIVE):
            if is_interactive(record):
                # Its client's connection went with the old agent.
                self._transition(record, FAILED, ended_at=time.time(), reason="agent_lost",
                                 error="the agent stopped while this interactive run was open")
                continue
            executor = self.executors.get((record.handle or {}).get("executor", "local"))
            if executor is None:   # a Docker run, and this agent has no Docker executor now
                executor = self.executors["local"]
            if record.handle is None:
                # Never launched: nothing ran, so it simply goes back in the queue.
                if record.status == CANCEL_REQUESTED:
                    self._transition(record, CANCELED, ended_at=time.time(), reason="canceled")
                else:
                    self._transition(record, QUEUED, allocation=None, event_type="run.requeued")
                continue
            # Reattaching (and a task that waits on the run) is not built yet: end what is left of the
            # run, so it never stays Running with nobody watching it.
            with trio.move_on_after(self.config.stop_grace_seconds + KILL_WAIT_SECONDS):
                await executor.abandon(record.handle, self.config.stop_grace_seconds)
            if record.status == CANCEL_REQUESTED:
                self._transition(record, CANCELED, ended_at=time.time(), reason=record.reason or "canceled")
            else:
                self._transition(record, FAILED, ended_at=time.time(), reason="agent_lost",
                                 error="the agent stopped while the run was active and could not reattach")
            log.warning("run.lost", run_id=record.run_id, status=record.status)
        if "docker" in self.executors and self.store.get_meta("docker_used", False):
            await self.executors["docker"].remove_orphans(self.config.stop_grace_seconds)

    # -- state changes -----------------------------------------------------------------

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

    async def submit(self, spec: dict, owner: Owner) -> RunRecord:
        """Check the spec and its snapshot against this agent and queue the run (durably)."""
        return (await self._queue(spec, owner, None))[0]

    async def submit_array(self, spec: dict, owner: Owner, array: dict) -> list[RunRecord]:
        """Queue one run per index of ``array`` (``indices``, ``throttle``), sharing an array id: all or none."""
        return await self._queue(spec, owner, array)

    async def _queue(self, spec: dict, owner: Owner, array: dict | None) -> list[RunRecord]:
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
        demand = Demand(**spec["resources"])
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
                self._make_run_dir(member_id, owner)
                if entries is not None:
                    self.snapshots.acquire(member_id, owner.uid, tree, entries)
                records.append(RunRecord(
                    run_id=member_id, order=0, experiment=spec["experiment"], number=0, uid=owner.uid,
                    gid=owner.gid, user=owner.user, status=QUEUED, spec=member_spec, environ=environ,
                    submitted_at=now,
                ))
            if array is None:
                self.store.add_run(records[0], EVENT_TYPES[QUEUED], parent_id=parent_id)
            else:
                self.store.add_array(records, EVENT_TYPES[QUEUED])
        except BaseException:
            with trio.CancelScope(shield=True):
                for member_id in created:
                    self.snapshots.release_snapshot(member_id)
                    await trio.to_thread.run_sync(shutil.rmtree, self.runs_dir / member_id, True)
            raise
        for record in records:
            log.debug("run.submitted", run_id=record.run_id, user=owner.user)
            record.environ = None   # stored; read back at launch, so ten thousand queued runs stay small
            self._enqueue(record)
        self.changed.notify()
        self.wake()
        return records

    def _make_run_dir(self, run_id: str, owner: Owner) -> None:
        creds = owner.credentials()
        # The run directory is its owner's (0700); what is in it is created with their rights.
        make_private_dir(self.runs_dir, run_id, creds)
        run_dir = self.runs_dir / run_id
        with acting_as(creds):
            # The snapshot itself is made when the run starts (Launch), from the contents stored now.
            (run_dir / "outputs").symlink_to("snapshot/outputs")
            (run_dir / "logs").mkdir()

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

        environment = spec.get("environment")
        if self._executor_name(spec) == "docker":
            if "docker" not in self.executors:
                refuse("docker", "this agent has no Docker executor")
            if self._image(spec) is None:
                refuse("docker", "a Docker run needs an image: Environment.from_docker_image(name, image), "
                                 "environment.docker.base_image, a target's image, or --image")
            translate_arguments((spec.get("docker") or {}).get("arguments", []), self.config.docker)
            if spec.get("distributed") is not None:
                refuse("distributed", "distributed runs in Docker containers are not supported yet")
            if environment is not None and not environment["python"]["user_managed_dependencies"] and (
                    environment["python"].get("pip_requirements") or environment["python"].get("conda_specification")):
                refuse("environment", "pip or conda dependencies on top of a Docker image are not built by this "
                                      "agent: bake them into the image")
        if environment is not None and environment["python"].get("conda_specification"):
            try:
                _conda.parse(environment["python"]["conda_specification"])
            except ValueError as exc:
                refuse("environment.python.conda_specification", f"not a conda specification: {exc}")
        distributed = spec.get("distributed")
        if distributed is not None:
            if distributed["node_count"] > 1:
                refuse("distributed", f"node_count={distributed['node_count']}: this agent runs on one machine; "
                                      "multi-node runs need a cluster compute target")
            if distributed["kind"] == "mpi" and shutil.which("mpirun") is None:
                refuse("distributed", "MPI runs need 'mpirun' on the agent's machine (e.g. Debian's openmpi-bin)")
        resume = spec.get("resume_from")
        if resume is not None:
            if resume["run_id"] is not None:
                source = self.store.get_run(resume["run_id"])
                if source is None:
                    refuse("resume_from", f"no run with id {resume['run_id']!r}")
                if source.uid != owner.uid and not owner.admin:
                    raise Forbidden(f"spec.resume_from: run {source.run_id} belongs to {source.user}")
                path = artifact_path(self.runs_dir / source.run_id, resume["path"], "spec.resume_from.path")
                with acting_as(owner.credentials()):
                    found = os.path.lexists(path)
                if not found:
                    refuse("resume_from", f"run {source.run_id} has no {resume['path']!r}")
            elif not os.path.isabs(resume["path"]):
                refuse("resume_from", f"a local path must be absolute, got {resume['path']!r}")

    def _target(self, spec: dict):
        return self.config.targets.get(spec.get("compute_target", "local"))

    def _executor_name(self, spec: dict) -> str:
        docker = spec.get("docker")
        target = self._target(spec)
        if (docker is not None and docker["use_docker"]) or (target is not None and target.kind == "docker"):
            return "docker"
        return "local"

    def _image(self, spec: dict) -> str | None:
        environment = spec.get("environment") or {}
        target = self._target(spec)
        return (environment.get("docker") or {}).get("base_image") or (target.image if target else None)

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
            self._transition(active.record, CANCEL_REQUESTED, reason=active.cancel_reason)
            active.kill_scope.cancel()
        return active.record

    def live_record(self, run_id: str) -> RunRecord | None:
        """The in-memory record of a queued or active run (it carries ``waiting``)."""
        if run_id in self.queued:
            if self._waiting_stale:
                self._decide()   # saturated, so this only explains the queue: nothing starts
            return self.queued[run_id]
        active = self.active.get(run_id)
        return active.record if active else None

    # -- scheduling --------------------------------------------------------------------

    def _saturated(self) -> bool:
        """True when no queued run can start: every run needs a CPU, and none is free (or the run cap is hit)."""
        if self.capacity.max_runs and len(self.active) >= self.capacity.max_runs:
            return True
        return sum(a.allocation.cpus for a in self.active.values()) >= self.capacity.cpus

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

    def _decide(self):
        now = time.time()
        pending, limits = [], {}
        for r in self.queued.values():
            array = self._array_of(r.spec)
            if array is not None:
                limits[array] = r.spec["array"]["throttle"]
            pending.append(Pending(run_id=r.run_id, user=r.user, priority=r.spec["priority"], order=r.order,
                                   demand=Demand(**r.spec["resources"]), duration=r.spec["max_run_duration_seconds"],
                                   blocked_by=self._unmet(r), array=array))
        active = [Active(a.record.run_id, a.record.user, a.allocation, a.ends_by, self._array_of(a.record.spec))
                  for a in self.active.values()]
        decision = schedule(pending, active, self.capacity, now, limits)
        for run_id, (reason, position) in decision.waiting.items():
            record = self.queued[run_id]
            record.waiting = {"reason": reason, "position": position}
            if reason == "dependency":
                record.waiting["on"] = list(self._unmet(record))
        self._waiting_stale = False
        return decision, now

    def _schedule(self, nursery: trio.Nursery) -> None:
        if self.waiting_on_others:
            self._cancel_failed_dependents()
        if not self.queued:
            return
        if self._saturated():
            # Nothing can start, so skip the pass (a full queue makes it O(n) per submit); the waiting
            # reasons are worked out when someone looks at the queue.
            self._waiting_stale = True
            return
        decision, now = self._decide()
        for start in decision.starts:
            record = self.queued.pop(start.run_id)
            self.waiting_on_others.discard(start.run_id)
            record.waiting = None
            run = _ActiveRun(record, start.allocation, trio.CancelScope(),
                             ends_by=now + record.spec["max_run_duration_seconds"])
            self.active[record.run_id] = run
            nursery.start_soon(self._run_one, run, name=f"run {record.run_id}")

    # -- one run -----------------------------------------------------------------------

    def _advance(self, run: _ActiveRun, status: str, **changes) -> None:
        """Move an active run forward unless a cancel got there first."""
        if run.cancel_reason is None:
            self._transition(run.record, status, **changes)
        elif changes:
            self.store.update_run(run.record, None, **changes)

    async def _run_one(self, run: _ActiveRun) -> None:
        record = run.record
        executor = self.executors[self._executor_name(record.spec)]
        handle = None
        result: ExitResult | None = None
        try:
            with run.kill_scope:
                self._advance(run, PREPARING, allocation=run.allocation.to_wire())
                run.token = secrets.token_urlsafe(24)
                try:
                    launch = await self.launches.prepare(record, run.allocation, run.token)
                except PrepareFailed as exc:
                    note_in_log(record, self.runs_dir / record.run_id / "logs" / "std_log.txt", f"labrun: {exc}\n")
                    self._finish(run, FAILED, reason=exc.reason, error=str(exc))
                    return
                self._advance(run, STARTING)
                await self.store.durable()   # a process starts only for a run whose state is saved
                try:
                    handle = await executor.start(launch)
                except StartFailed as exc:
                    note_in_log(record, launch.ranks[0].log_path, f"labrun: {exc}\n")
                    self._finish(run, FAILED, reason=exc.reason, error=str(exc))
                    return
                duration = record.spec["max_run_duration_seconds"]
                run.ends_by = time.time() + duration
                run.kill_scope.deadline = trio.current_time() + duration
                self._advance(run, RUNNING, started_at=time.time(), pid=handle.get("pid"), handle=handle)
                result = await executor.wait(handle)
            if run.kill_scope.cancelled_caught:
                if run.cancel_reason is None:
                    run.cancel_reason = "max_run_duration_exceeded"
                    self._transition(record, CANCEL_REQUESTED, reason=run.cancel_reason)
                if handle is not None:
                    with trio.move_on_after(self.config.stop_grace_seconds + KILL_WAIT_SECONDS, shield=True):
                        await self.store.durable()
                        await executor.stop(handle, self.config.stop_grace_seconds)
                        result = await executor.wait(handle)
                self._finish(run, FAILED if run.fail_error else CANCELED, reason=run.cancel_reason,
                             error=run.fail_error, result=result)
            else:
                self._finish(run, None, result=result)
        except Exception as exc:
            # A bug or an I/O error of the agent: the run fails, the agent goes on.
            log.exception("run.supervise.failed", run_id=record.run_id)
            if record.status not in (COMPLETED, FAILED, CANCELED):
                self._finish(run, FAILED, reason="agent_error", error=f"agent error: {exc}")
        finally:
            del self.active[record.run_id]
            self.wake()

    def _finish(self, run: _ActiveRun, status: str | None, *, reason: str | None = None,
                error: str | None = None, result: ExitResult | None = None) -> None:
        record = run.record
        exit_fields = {}
        if result is not None:
            exit_fields = {"exit_code": result.exit_code, "signal": result.signal}
        if status is None and record.status == CANCEL_REQUESTED:
            # It ended by itself just as the cancel (or fail) arrived.
            status, reason, error = (FAILED if run.fail_error else CANCELED), run.cancel_reason, run.fail_error
        if status is None:   # the process ended by itself
            if result.ok:
                status = COMPLETED
            else:
                status = FAILED
                if result.memory_exceeded:
                    reason = "memory_limit_exceeded"
                    error = (f"the run used more than the {format_memory(run.allocation.memory)} of memory it "
                             "asked for and was killed")
                elif result.signal is not None:
                    reason, error = "signal", f"killed by signal {result.signal} ({signals.Signals(result.signal).name})"
                else:
                    reason = "exit_code"
                    error = failure_message(self.runs_dir / record.run_id) or f"exited with code {result.exit_code}"
            if record.status == RUNNING:
                self._transition(record, FINALIZING, **exit_fields)
        elif status == CANCELED and error is None:
            error = ("canceled: the run exceeded its max_run_duration_seconds"
                     if reason == "max_run_duration_exceeded" else "canceled")
        self._transition(record, status, ended_at=time.time(), reason=reason, error=error, **exit_fields)
