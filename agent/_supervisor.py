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
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal as signals
import time
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import structlog
import trio

from labrun.protocol import BadRequest, Conflict, Forbidden, Unavailable, format_memory
from labrun.protocol._statuses import (
    ACTIVE, CANCEL_REQUESTED, CANCELED, COMPLETED, FAILED, FINALIZING, PREPARING, QUEUED, RUNNING, STARTING,
)

from ._artifacts import artifact_path
from ._config import AgentConfig
from ._docker_args import translate_arguments
from ._environments import EnvironmentBuilder, PrepareFailed, needs_conda
from ._executor import ExitResult, StartFailed
from ._launch import LaunchPlanner, run_duration
from ._model import RunRecord
from ._notify import Notifier
from ._scheduler import Active, Allocation, Capacity, Demand, Pending, schedule
from ._snapshot import extract_snapshot
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


@dataclass
class _ActiveRun:
    record: RunRecord
    allocation: Allocation
    kill_scope: trio.CancelScope
    ends_by: float
    cancel_reason: str | None = None
    token: str = ""
    local: bool = True   # counts against this machine's capacity (a Slurm run does not)


class Supervisor:
    def __init__(self, config: AgentConfig, store: Store, capacity: Capacity, executors: dict):
        self.config = config
        self.store = store
        self.capacity = capacity
        self.executors = executors
        self.runs_dir = config.state_dir / "runs"
        self.queued: dict[str, RunRecord] = {}
        self.active: dict[str, _ActiveRun] = {}
        self.changed = Notifier()
        self._wakeup = trio.Event()
        self._waiting_stale = False
        self.launches = LaunchPlanner(config, store, capacity, EnvironmentBuilder(config.state_dir / "envs"),
                                      self._executor_name, self._image, self._slurm_target)
        self._nursery: trio.Nursery | None = None
        self._reattach: list[RunRecord] = []

    def token_valid(self, run_id: str, token: str) -> bool:
        active = self.active.get(run_id)
        return active is not None and secrets.compare_digest(active.token, token)

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Recover what an earlier agent left, then schedule until cancelled (agent shutdown)."""
        await self._recover()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for record in self._reattach:
                self._launch_remote(record, record.handle)
            for record in self.store.runs_with_status([QUEUED]):
                record.environ = None
                if record.handle is not None and self._reattachable(record.handle):
                    self._launch_remote(record, record.handle)   # waiting in Slurm's queue
                elif self._slurm_target(record.spec) is not None:
                    self._launch_remote(record)
                else:
                    self.queued[record.run_id] = record
            task_status.started()
            while True:
                self._schedule(nursery)
                await self._wakeup.wait()
                self._wakeup = trio.Event()

    def wake(self) -> None:
        self._wakeup.set()

    def _reattachable(self, handle: dict) -> bool:
        """Whether the executor of ``handle`` follows runs an earlier agent started (Slurm: by job id)."""
        return getattr(self.executors.get(handle.get("executor", "local")), "reports_progress", False)

    async def _recover(self) -> None:
        self._reattach = []
        for record in self.store.runs_with_status(ACTIVE):
            if record.handle is not None and self._reattachable(record.handle):
                self._reattach.append(record)
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

    async def submit(self, spec: dict, snapshot: bytes | Path, owner: Owner) -> RunRecord:
        """Check the spec against this agent, unpack the snapshot and queue the run (durably)."""
        self._check_features(spec, owner)
        target = spec["compute_target"]
        if target != "local":
            configured = self.config.targets.get(target)
            if configured is None:
                known = ", ".join(["local", *sorted(self.config.targets)])
                raise BadRequest(f"spec.compute_target: unknown compute target {target!r} (this agent has: {known})",
                                 details={"field": "spec.compute_target"})
        demand = Demand(**spec["resources"])
        slurm = self._slurm_target(spec)
        too_big = self.capacity.fits_ever(demand) if slurm is None else None   # Slurm judges its own cluster
        if too_big:
            raise BadRequest(f"spec.resources: the run {too_big}; it could never start",
                             details={"field": "spec.resources"})

        now = time.time()
        run_id = f"{spec['experiment']}_{int(now)}_{uuid.uuid4().hex[:8]}"
        run_dir = self.runs_dir / run_id
        chown = os.geteuid() == 0 and owner.uid != 0
        try:
            if slurm is not None:
                self._shared_run_dir(slurm, run_id)
            else:
                run_dir.mkdir(parents=True)
            await extract_snapshot(snapshot, run_dir / "snapshot",
                                   uid=owner.uid if chown else None, gid=owner.gid if chown else None)
            if spec["script"] is not None and not (run_dir / "snapshot" / spec["script"]).is_file():
                raise BadRequest(f"spec.script: {spec['script']!r} is not a file in the snapshot of the source "
                                 "directory; the script must be inside source_directory",
                                 details={"field": "spec.script"})
            outputs = run_dir / "snapshot" / "outputs"
            outputs.mkdir(exist_ok=True)
            (run_dir / "outputs").symlink_to("snapshot/outputs")
            (run_dir / "logs").mkdir()
            if chown:
                for path in (run_dir, outputs, run_dir / "logs"):
                    os.chown(path, owner.uid, owner.gid)
            environ = spec.pop("environ")
            spec.pop("snapshot")
            record = RunRecord(
                run_id=run_id, order=0, experiment=spec["experiment"], number=0, uid=owner.uid, gid=owner.gid,
                user=owner.user, status=QUEUED, spec=spec, environ=environ, submitted_at=now,
            )
            self.store.add_run(record, EVENT_TYPES[QUEUED])
        except BaseException:
            with trio.CancelScope(shield=True):
                if run_dir.is_symlink():
                    await trio.to_thread.run_sync(shutil.rmtree, run_dir.resolve(), True)
                    run_dir.unlink()
                await trio.to_thread.run_sync(shutil.rmtree, run_dir, True)
            raise
        log.debug("run.submitted", run_id=run_id, user=owner.user)
        record.environ = None   # stored; read back at launch, so ten thousand queued runs stay small
        if slurm is not None:
            self._launch_remote(record)
        else:
            self.queued[run_id] = record
        self.changed.notify()
        self.wake()
        return record

    def _shared_run_dir(self, slurm, run_id: str) -> Path:
        """A Slurm run's directory lives in the target's run_root (the nodes share it); the agent links to it."""
        if not slurm.run_root.is_dir():
            raise Unavailable(f"the Slurm target's run_root {str(slurm.run_root)!r} is not a directory on this "
                              "machine; ask the agent's administrator")
        real = slurm.run_root / run_id
        real.mkdir(mode=0o700)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        (self.runs_dir / run_id).symlink_to(real)
        return real

    def _check_features(self, spec: dict, owner: Owner) -> None:
        """Refuse at submit what this machine cannot run, naming the field."""
        def refuse(field, message):
            raise BadRequest(f"spec.{field}: {message}", details={"field": f"spec.{field}"})

        environment = spec.get("environment")
        distributed = spec.get("distributed")
        if self._slurm_target(spec) is not None:
            if (spec.get("docker") or {}).get("use_docker"):
                refuse("docker", "Docker containers are not run on a Slurm target")
            if distributed is not None and distributed["kind"] == "pytorch" and distributed["process_count"] \
                    and distributed["process_count"] < distributed["node_count"]:
                refuse("distributed", f"process_count={distributed['process_count']} is smaller than "
                                      f"node_count={distributed['node_count']}")
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
        if environment is not None and needs_conda(environment) and shutil.which("conda") is None:
            refuse("environment", f"environment {environment['name']!r} is a conda specification, and this "
                                  "machine has no 'conda' binary; use pip requirements or install conda")
        if distributed is not None and self._slurm_target(spec) is None:
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
                path = artifact_path(self.runs_dir / source.run_id, resume["path"])
                if not path.exists():
                    refuse("resume_from", f"run {source.run_id} has no {resume['path']!r}")
            elif not os.path.isabs(resume["path"]):
                refuse("resume_from", f"a local path must be absolute, got {resume['path']!r}")

    def _target(self, spec: dict):
        return self.config.targets.get(spec.get("compute_target", "local"))

    def _slurm_target(self, spec: dict):
        target = self._target(spec)
        return target.slurm if target is not None and target.kind == "slurm" else None

    def _executor_name(self, spec: dict) -> str:
        docker = spec.get("docker")
        target = self._target(spec)
        if target is not None and target.kind == "slurm":
            return "slurm"
        if (docker is not None and docker["use_docker"]) or (target is not None and target.kind == "docker"):
            return "docker"
        return "local"

    def _image(self, spec: dict) -> str | None:
        environment = spec.get("environment") or {}
        target = self._target(spec)
        return (environment.get("docker") or {}).get("base_image") or (target.image if target else None)

    def cancel(self, record: RunRecord) -> RunRecord:
        """Cancel a queued run at once, or ask an active run's task to stop it."""
        if record.run_id in self.queued:
            record = self.queued.pop(record.run_id)
            record.waiting = None
            self._transition(record, CANCELED, ended_at=time.time(), reason="canceled")
            self.wake()
            return record
        active = self.active.get(record.run_id)
        if active is None:
            if record.status == CANCELED:
                return record   # canceling twice is harmless
            raise Conflict(f"run {record.run_id} has already ended ({record.status})")
        if active.cancel_reason is None and active.record.status != FINALIZING:
            active.cancel_reason = "canceled"
            self._transition(active.record, CANCEL_REQUESTED, reason="canceled")
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
        local = [a for a in self.active.values() if a.local]
        if self.capacity.max_runs and len(local) >= self.capacity.max_runs:
            return True
        return sum(a.allocation.cpus for a in local) >= self.capacity.cpus

    def _decide(self):
        now = time.time()
        pending = [
            Pending(run_id=r.run_id, user=r.user, priority=r.spec["priority"], order=r.order,
                    demand=Demand(**r.spec["resources"]), duration=r.spec["max_run_duration_seconds"])
            for r in self.queued.values()
        ]
        active = [Active(a.record.run_id, a.record.user, a.allocation, a.ends_by) for a in self.active.values()
                  if a.local]
        decision = schedule(pending, active, self.capacity, now)
        for run_id, (reason, position) in decision.waiting.items():
            self.queued[run_id].waiting = {"reason": reason, "position": position}
        self._waiting_stale = False
        return decision, now

    def _schedule(self, nursery: trio.Nursery) -> None:
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

    async def _run_one(self, run: _ActiveRun, handle: dict | None = None) -> None:
        """Launch the run (unless ``handle`` says an earlier agent did), follow it, and end it."""
        record = run.record
        executor = self.executors[handle["executor"] if handle else self._executor_name(record.spec)]
        result: ExitResult | None = None
        try:
            with run.kill_scope:
                if handle is None:
                    handle = await self._launch(run, executor)
                    if handle is None:
                        return
                if getattr(executor, "reports_progress", False):
                    result = await executor.wait(handle, partial(self._progress, run))
                else:
                    result = await executor.wait(handle)
            if run.kill_scope.cancelled_caught:
                if run.cancel_reason is None:
                    run.cancel_reason = "max_run_duration_exceeded"
                    self._transition(record, CANCEL_REQUESTED, reason=run.cancel_reason)
                if handle is not None:
                    with trio.move_on_after(self.config.stop_grace_seconds + KILL_WAIT_SECONDS, shield=True):
                        await executor.stop(handle, self.config.stop_grace_seconds)
                        result = await executor.wait(handle)
                self._finish(run, CANCELED, reason=run.cancel_reason, result=result)
            else:
                if result.started:
                    self._walk(run, RUNNING)
                self._finish(run, result.status, reason=result.reason, error=result.error, result=result)
        except Exception as exc:
            # A bug or an I/O error of the agent: the run fails, the agent goes on.
            log.exception("run.supervise.failed", run_id=record.run_id)
            if record.status not in (COMPLETED, FAILED, CANCELED):
                self._finish(run, FAILED, reason="agent_error", error=f"agent error: {exc}")
        finally:
            del self.active[record.run_id]
            self.wake()

    async def _launch(self, run: _ActiveRun, executor) -> dict | None:
        """Prepare and start the run; None when that failed (the run has then ended)."""
        record = run.record
        self._advance(run, PREPARING, allocation=run.allocation.to_wire())
        run.token = secrets.token_urlsafe(24)
        try:
            launch = await self.launches.prepare(record, run.allocation, run.token)
        except PrepareFailed as exc:
            with open(self.runs_dir / record.run_id / "logs" / "std_log.txt", "a") as log_file:
                log_file.write(f"labrun: {exc}\n")
            self._finish(run, FAILED, reason=exc.reason, error=str(exc))
            return None
        queues = getattr(executor, "reports_progress", False)
        if not queues:
            self._advance(run, STARTING)
        try:
            handle = await executor.start(launch)
        except StartFailed as exc:
            with open(launch.ranks[0].log_path, "a") as log_file:
                log_file.write(f"labrun: {exc}\n")
            self._finish(run, FAILED, reason=exc.reason, error=str(exc))
            return None
        if queues:
            # The run now waits in the cluster's own queue; its token survives an agent restart with the handle.
            handle["token"] = run.token
            self._advance(run, QUEUED, handle=handle)
            return handle
        duration = record.spec["max_run_duration_seconds"]
        run.ends_by = time.time() + duration
        run.kill_scope.deadline = trio.current_time() + duration
        self._advance(run, RUNNING, started_at=time.time(), pid=handle.get("pid"), handle=handle)
        return handle

    # -- runs on a target with its own queue (Slurm) -----------------------------------

    def _launch_remote(self, record: RunRecord, handle: dict | None = None) -> None:
        """Start following a Slurm run at once: the cluster queues it, never this machine's scheduler."""
        resources = record.spec["resources"]
        run = _ActiveRun(record, Allocation(cpus=resources["cpus"], memory=resources["memory"]), trio.CancelScope(),
                         ends_by=math.inf, local=False)
        if handle is not None:   # an earlier agent submitted it
            run.token = handle.get("token", "")
            if record.status == CANCEL_REQUESTED:
                run.cancel_reason = record.reason or "canceled"
                run.kill_scope.cancel()
            elif record.status in (RUNNING, FINALIZING) and record.started_at is not None:
                self._limit_from(run, record.started_at)
        self.active[record.run_id] = run
        self._nursery.start_soon(self._run_one, run, handle, name=f"run {record.run_id}")

    def _limit_from(self, run: _ActiveRun, started_at: float) -> None:
        """The run's time limit counts from ``started_at`` (wall clock)."""
        duration = run_duration(run.record.spec, self._slurm_target(run.record.spec))
        run.ends_by = started_at + duration
        run.kill_scope.deadline = trio.current_time() + (run.ends_by - time.time())

    def _progress(self, run: _ActiveRun, status: str, job) -> None:
        """The cluster reports a new state for the run's job (mapped to a labrun status)."""
        record = run.record
        if status == QUEUED:
            reason = job.reason if job.reason not in ("", "None") else job.state   # Slurm says None before its first pass
            record.waiting = {"reason": f"slurm: {reason}", "position": None, "job_id": job.job_id}
            if record.status in (STARTING, RUNNING) and run.cancel_reason is None:   # preempted or requeued
                self._transition(record, QUEUED, event_type="run.requeued")
                run.kill_scope.deadline = math.inf
            self.changed.notify()
            return
        record.waiting = None
        self._walk(run, status)

    def _walk(self, run: _ActiveRun, status: str) -> None:
        """Through each status a local run passes on its way to ``status``: Starting, Running, Finalizing."""
        steps = [STARTING, RUNNING, FINALIZING]
        if status not in steps or run.cancel_reason is not None:
            return   # an end is _finish's to record
        reached = steps.index(run.record.status) if run.record.status in steps else -1
        for step in steps[reached + 1: steps.index(status) + 1]:
            if step == RUNNING:
                now = time.time()
                self._limit_from(run, now)
                self._transition(run.record, RUNNING, started_at=now)
            else:
                self._transition(run.record, step)

    def _finish(self, run: _ActiveRun, status: str | None, *, reason: str | None = None,
                error: str | None = None, result: ExitResult | None = None) -> None:
        record = run.record
        exit_fields = {}
        if result is not None:
            exit_fields = {"exit_code": result.exit_code, "signal": result.signal}
        if status is None and record.status == CANCEL_REQUESTED:
            status = CANCELED   # it ended by itself just as the cancel arrived
            reason = run.cancel_reason
        if status == CANCELED and record.status not in (QUEUED, CANCEL_REQUESTED):
            # Canceled outside labrun (Slurm's scancel or time limit): the same two steps as a cancel here.
            self._transition(record, CANCEL_REQUESTED, reason=reason)
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
                    reason, error = "exit_code", f"exited with code {result.exit_code}"
            if record.status == RUNNING:
                self._transition(record, FINALIZING, **exit_fields)
        elif status == CANCELED and error is None:
            error = ("canceled: the run exceeded its max_run_duration_seconds"
                     if reason == "max_run_duration_exceeded" else "canceled")
        self._transition(record, status, ended_at=time.time(), reason=reason, error=error, **exit_fields)
