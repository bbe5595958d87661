"""The Slurm executor: a run is a Slurm batch job on a cluster the agent's machine can submit to.

- ``start`` submits with ``sbatch`` as the run's owner (their uid, gid and groups; never as root on
  their behalf). The batch script comes on stdin, the run's environment is sbatch's own
  (``--export=ALL``), without the client's ``SLURM_*``/``SBATCH_*`` variables, which would steer
  sbatch itself. The handle is the job id, so recovering after an agent restart is a lookup. The job's
  name holds the run id: a run whose agent died after sbatch but before recording the job is found
  again by name rather than submitted twice.
- ``wait`` follows the job with ``squeue`` (one call for every job being followed at that moment),
  polling with backoff: fast after a change, slower while nothing happens, slower still while the
  controller does not answer (a dead controller never fails a run). Each state change is reported to
  the supervisor, which maps it to the run's status. The exit status comes from the file the batch
  script writes into the run directory: without an accounting database Slurm forgets it, and
  ``sacct`` is only the fallback for a job that ended unseen.
- ``stop`` is ``scancel --signal=TERM --batch``: the batch script passes SIGTERM on to the command's
  process group, then SIGKILL after the agent's grace period, and records how the command ended; a
  plain ``scancel`` ends the job if that fails. A pending job is simply removed from the queue.

Run directories live in the target's ``run_root``, which the nodes share (the agent's ``runs/<id>`` is a
link to it), and so do pip environments built for Slurm runs (``run_root/envs``). Handle: ``SlurmHandle``
(the job id, the run directory and its owner), so recovering after an agent restart is a lookup.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import structlog
import trio

from labrun.protocol import MAX_DURATION_SECONDS_DEFAULT, Unavailable
from labrun.protocol._statuses import COMPLETED, FAILED, QUEUED

from .._asuser import Credentials, make_private_dir
from .._environments import EnvironmentBuilder, needs_conda
from .._rundir import RunDir
from ._base import (
    Capabilities, Ended, Executor, ExitResult, Handle, LaunchSpec, Live, Lost, Preparation, Recovery, StartFailed,
    refuse,
)
from ._slurm_plan import (
    ENDED, EXIT_FILE, SQUEUE_FORMAT, SUBMITTED_FILE, JobState, SlurmArray, SlurmJob, SlurmSettings, array_batch_script,
    array_job_of, batch_script, layout, map_state, parse_exit_status, parse_squeue, sbatch_argv, sbatch_job_id,
    state_error, with_array_remainders,
)

log = structlog.get_logger("labrun.slurm")

POLL_MIN_SECONDS = 0.05
POLL_MAX_SECONDS = 2.0
POLL_UNAVAILABLE_MAX_SECONDS = 30.0
COMMAND_TIMEOUT_SECONDS = 60.0
# The batch script writes its exit status before the job ends; a shared filesystem may show it a little later.
EXIT_FILE_WAIT_SECONDS = 2.0
# How long past the grace period the batch script may take to record the exit status of a killed command.
SCRIPT_KILL_MARGIN_SECONDS = 2.0
# Variables that steer Slurm's own commands: the client's must not choose the job's partition or account.
_SLURM_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SCANCEL_")


class SlurmUnavailable(Exception):
    """The Slurm controller did not answer (or a Slurm command is missing)."""


def _command(name: str) -> str:
    return shutil.which(name) or name


def job_environment(env: dict[str, str]) -> dict[str, str]:
    """The run's environment for sbatch: the client's Slurm variables out, the agent's SLURM_CONF in."""
    cleaned = {k: v for k, v in env.items() if not k.startswith(_SLURM_PREFIXES)}
    if "SLURM_CONF" in os.environ:
        cleaned["SLURM_CONF"] = os.environ["SLURM_CONF"]
    return cleaned


def read_status_file(path: Path) -> str | None:
    """The exit status file, if it is a plain file. It lies in a directory its user controls: never follow a
    link, never block on a FIFO, never read more than a status needs."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, 64).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _first_submit(marker: Path) -> bool:
    """Mark the run as submitted; False if it already was. Never follows a link the run's user could plant."""
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    except FileExistsError:
        return False
    except OSError:
        pass   # not writable here (a root-squashing share): submit, as without the mark
    return True


def _waiting(job: JobState) -> dict:
    """Why a pending job waits, as ``labrun ls`` shows it: Slurm's reason (it says None before its first pass)."""
    reason = job.reason if job.reason not in ("", "None") else job.state
    return {"reason": f"slurm: {reason}", "job_id": job.job_id}


class _Squeue:
    """One ``squeue`` for all the jobs followed at once: a waiter reuses a result newer than its question."""

    def __init__(self):
        self.watched: dict[str, int] = {}
        self._lock = trio.Lock()
        self._states: dict[str, JobState] = {}
        self._fetched_at = -math.inf

    async def states(self, asked_at: float) -> dict[str, JobState]:
        async with self._lock:
            if self._fetched_at < asked_at:
                started = trio.current_time()
                self._states = await self._query(sorted(self.watched))
                self._fetched_at = started
            return self._states

    async def state_of(self, job_id: str) -> JobState | None:
        """The job's state now (a fresh query), whether or not anyone follows it."""
        return (await self.states_of([job_id]))[0]

    async def states_of(self, job_ids: list[str]) -> list[JobState | None]:
        """The jobs' states now (one fresh query), whether or not anyone follows them."""
        for job_id in job_ids:
            self.watch(job_id)
        try:
            states = await self.states(trio.current_time())
            return [states.get(job_id) for job_id in job_ids]
        finally:
            for job_id in job_ids:
                self.unwatch(job_id)

    def watch(self, job_id: str) -> None:
        self.watched[job_id] = self.watched.get(job_id, 0) + 1

    def unwatch(self, job_id: str) -> None:
        self.watched[job_id] -= 1
        if not self.watched[job_id]:
            del self.watched[job_id]

    async def _query(self, job_ids: list[str]) -> dict[str, JobState]:
        if not job_ids:
            return {}
        # An array task's job array too: its record stands for tasks canceled before they started.
        arrays = sorted({a for a in map(array_job_of, job_ids) if a is not None} - set(job_ids))
        argv = [_command("squeue"), "--noheader", "--states=all", "--array", f"--jobs={','.join(job_ids + arrays)}",
                f"--format={SQUEUE_FORMAT}"]
        try:
            with trio.fail_after(COMMAND_TIMEOUT_SECONDS):
                result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                                env=job_environment(dict(os.environ)))
        except (OSError, trio.TooSlowError) as exc:
            raise SlurmUnavailable(f"squeue: {exc}") from None
        if result.returncode != 0:
            error = result.stderr.decode(errors="replace").strip()
            if "Invalid job id" in error:
                return {}   # every job asked about has left squeue's memory
            raise SlurmUnavailable(f"squeue: {error or 'exit code %d' % result.returncode}")
        return with_array_remainders(parse_squeue(result.stdout.decode(errors="replace")), job_ids)


@dataclass(frozen=True)
class SlurmHandle(Handle):
    kind = "slurm"
    # 2: ``array_job``, for a run that is one task of a Slurm job array (its ``job_id`` is ``<array_job>_<index>``).
    VERSION = 2

    job_id: str
    run_dir: str      # the run directory as the nodes know it (in run_root)
    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    array_job: str | None = None   # the job array's id: ``scancel`` of it ends every task

    @classmethod
    def upgrade(cls, data: dict, version: int) -> dict:
        if version == 1:
            return {**data, "array_job": None}   # version 1 knew only single jobs
        return super().upgrade(data, version)


@dataclass
class _ArrayStop:
    """An array canceled as a whole: the first of its runs to be stopped stops them all, the others wait."""

    handles: list[SlurmHandle]
    done: trio.Event | None = None


class SlurmExecutor(Executor):
    kind = "slurm"
    # The cluster's capacity, not this machine's; its jobs outlive the agent; Slurm has its own queue.
    capabilities = Capabilities(gpus=True, distributed=True, counted_locally=False, outlives_agent=True,
                                own_queue=True, arrays=True)
    handle_type = SlurmHandle

    def __init__(self, grace: float = 10.0):
        self.grace = grace
        self._squeue = _Squeue()
        self._environments: dict[Path, EnvironmentBuilder] = {}
        self._array_stops: dict[str, _ArrayStop] = {}   # by job array id

    def admit(self, spec: dict, target) -> None:
        """Refuse what a Slurm target cannot run; a run without its own time limit gets the target's ``time``."""
        if (spec.get("docker") or {}).get("use_docker"):
            refuse("docker", "Docker containers are not run on a Slurm target")
        super().admit(spec, target)
        distributed = spec.get("distributed")
        if distributed is not None and distributed["kind"] == "pytorch" and distributed["process_count"] \
                and distributed["process_count"] < distributed["node_count"]:
            refuse("distributed", f"process_count={distributed['process_count']} is smaller than "
                                  f"node_count={distributed['node_count']}")
        environment = spec.get("environment")
        if environment is not None and needs_conda(environment) and shutil.which("conda") is None:
            refuse("environment", f"environment {environment['name']!r} is a conda specification, and this "
                                  "machine has no 'conda' binary to build it with; use pip requirements")
        if target.slurm.time is not None and spec["max_run_duration_seconds"] == MAX_DURATION_SECONDS_DEFAULT:
            spec["max_run_duration_seconds"] = target.slurm.time

    def make_run_dir(self, target, run_dir: RunDir, creds: Credentials | None = None) -> None:
        """The run's directory is in the target's run_root, which the nodes share; the agent's is a link to it."""
        run_root = target.slurm.run_root
        if not run_root.is_dir():
            raise Unavailable(f"the Slurm target's run_root {str(run_root)!r} is not a directory on this machine; "
                              "ask the agent's administrator")
        # The owner's private directory (0700), as a local run's is.
        make_private_dir(run_root, run_dir.run_id, creds)
        run_dir.root.symlink_to(run_root / run_dir.run_id)

    async def prepare(self, preparation: Preparation) -> LaunchSpec:
        slurm = preparation.target.slurm
        spec = preparation.record.spec
        # The nodes know the run directory by its place in run_root, not by the agent's link to it.
        run_dir = RunDir(preparation.run_dir.root.resolve())
        envs = slurm.run_root / "envs"
        if envs not in self._environments:
            self._environments[envs] = EnvironmentBuilder(envs)
        plan = layout(spec.get("distributed"))
        launch = await preparation.planner.plan(dataclasses.replace(preparation, run_dir=run_dir),
                                                cluster_tasks=plan.tasks, environments=self._environments[envs])
        resources = spec["resources"]
        job = SlurmJob(run_id=launch.run_id, argv=launch.argv, cwd=str(launch.cwd), logs=str(run_dir.logs),
                       run_dir=str(run_dir.root), duration=spec["max_run_duration_seconds"], cpus=resources["cpus"],
                       memory=resources["memory"], gpus=resources["gpus"], distributed=spec.get("distributed"),
                       python=launch.argv[0] if spec["script"] is not None else "python3", grace=self.grace)
        launch.slurm = {"job": job, "settings": SlurmSettings(partition=slurm.partition, account=slurm.account,
                                                              qos=slurm.qos, sbatch_args=slurm.sbatch_args,
                                                              mpi=slurm.mpi),
                        "array": spec.get("array")}
        return launch

    # -- running commands as the run's owner --------------------------------------------

    @staticmethod
    def _as_owner(owner) -> dict:
        """Options that run a command as the run's owner: never as root on their behalf."""
        if owner is None or os.geteuid() != 0 or owner.uid == 0:
            return {}
        return {"user": owner.uid, "group": owner.gid, "extra_groups": list(owner.groups)}

    async def _run(self, argv: list[str], owner, **options) -> trio.Process:
        with trio.fail_after(COMMAND_TIMEOUT_SECONDS):
            return await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False,
                                          **self._as_owner(owner), **options)

    # -- the interface -------------------------------------------------------------------

    async def start(self, launch: LaunchSpec) -> SlurmHandle:
        job, settings = launch.slurm["job"], launch.slurm["settings"]
        owner = SlurmHandle(job_id="", run_dir=job.run_dir, uid=launch.uid, gid=launch.gid,
                            groups=tuple(launch.groups))
        if not _first_submit(Path(job.run_dir) / SUBMITTED_FILE):
            # An earlier agent ran sbatch for this run and died before it recorded the job: find that job.
            earlier = await self._job_named(job.name)
            if earlier is not None:
                log.warning("slurm.adopted", run_id=launch.run_id, job_id=earlier)
                return dataclasses.replace(owner, job_id=earlier)
        argv = sbatch_argv(job, settings, script="-", sbatch=_command("sbatch"))[:-1]   # the script on stdin
        job_id = await self._sbatch(argv, batch_script(job, settings), {**launch.env, **launch.ranks[0].env}, owner,
                                    launch.cwd)
        log.info("slurm.submitted", run_id=launch.run_id, job_id=job_id)
        return dataclasses.replace(owner, job_id=job_id)

    async def start_array(self, launches: list[LaunchSpec], throttle: int) -> list[SlurmHandle]:
        """Members of one labrun array as one ``sbatch --array`` job (``throttle``: Slurm's ``%N``); their handles
        are its tasks, ``<job id>_<index>``, in the order of ``launches``."""
        first = launches[0]
        indices = [launch.slurm["array"]["index"] for launch in launches]
        environments = [job_environment({**launch.env, **launch.ranks[0].env}) for launch in launches]
        # What every member sees goes in sbatch's environment; the rest (run id, token, index) in the script.
        shared = dict(set.intersection(*(set(env.items()) for env in environments)))
        array = SlurmArray(array_id=first.slurm["array"]["id"], run_root=str(Path(first.slurm["job"].run_dir).parent),
                           tasks={i: launch.slurm["job"] for i, launch in zip(indices, launches)},
                           task_env={i: {k: v for k, v in env.items() if shared.get(k) != v}
                                     for i, env in zip(indices, environments)},
                           throttle=throttle)
        array_id = array.array_id
        owner = SlurmHandle(job_id="", run_dir="", uid=first.uid, gid=first.gid, groups=tuple(first.groups))
        job_id = None
        submitted = [_first_submit(Path(job.run_dir) / SUBMITTED_FILE) for job in array.tasks.values()]
        if not all(submitted):
            # An earlier agent ran sbatch for this array and died before it recorded the job: find that job.
            job_id = await self._job_named(array.job().name)
            if job_id is not None:
                log.warning("slurm.adopted", array_id=array_id, job_id=job_id)
        if job_id is None:
            settings = first.slurm["settings"]
            argv = sbatch_argv(array.job(), settings, script="-", sbatch=_command("sbatch"),
                               array=array.array_option())[:-1]
            job_id = await self._sbatch(argv, array_batch_script(array, settings), shared, owner, first.cwd)
            log.info("slurm.submitted", array_id=array_id, job_id=job_id, tasks=array.array_option())
        return [dataclasses.replace(owner, job_id=f"{job_id}_{i}", run_dir=launch.slurm["job"].run_dir,
                                    array_job=job_id) for i, launch in zip(indices, launches)]

    async def _sbatch(self, argv: list[str], script: str, env: dict[str, str], owner: SlurmHandle, cwd) -> str:
        """Submit ``script`` as the run's owner; the job id, or ``StartFailed`` saying why not."""
        env = job_environment(env)
        env.setdefault("PATH", os.defpath)
        try:
            # Shielded: a cancel landing mid-submit must not leave a job that no handle knows of.
            with trio.CancelScope(shield=True):
                result = await self._run(argv, owner, stdin=script.encode(), env=env, cwd=str(cwd))
        except OSError as exc:
            raise StartFailed(f"cannot run sbatch: {exc.strerror or exc}", reason="slurm_unavailable") from None
        except trio.TooSlowError:
            raise StartFailed(f"sbatch did not answer within {COMMAND_TIMEOUT_SECONDS:.0f} s",
                              reason="slurm_unavailable") from None
        if result.returncode != 0:
            why = result.stderr.decode(errors="replace").strip() or f"sbatch exited {result.returncode}"
            raise StartFailed(f"Slurm refused the job: {why}")
        try:
            return sbatch_job_id(result.stdout.decode(errors="replace"))
        except ValueError as exc:
            raise StartFailed(str(exc)) from None

    async def _job_named(self, name: str) -> str | None:
        """The newest job (or job array) of that name Slurm still knows, if any."""
        try:
            result = await self._run([_command("squeue"), "--noheader", "--states=all", f"--name={name}",
                                      "--format=%F"], None, env=job_environment(dict(os.environ)))
        except (OSError, trio.TooSlowError):
            return None
        found = [line.strip() for line in result.stdout.decode(errors="replace").split() if line.strip().isdigit()]
        return max(found, key=int) if result.returncode == 0 and found else None

    async def wait(self, handle: SlurmHandle, progress: Callable[[str, dict | None], Awaitable[None]] | None = None
                   ) -> ExitResult:
        """Until the job has ended; ``progress(labrun status, waiting)`` on each change of its state or reason."""
        job_id = handle.job_id
        self._squeue.watch(job_id)
        try:
            interval, seen, last = POLL_MIN_SECONDS, False, None
            while True:
                asked_at = trio.current_time()
                try:
                    job = (await self._squeue.states(asked_at)).get(job_id)
                except SlurmUnavailable as exc:
                    log.warning("slurm.unavailable", job_id=job_id, error=str(exc))
                    interval = min(max(interval * 2, 1.0), POLL_UNAVAILABLE_MAX_SECONDS)
                    await trio.sleep(interval)
                    continue
                if job is None:
                    return await self._ended_unseen(handle, seen)
                status, _ = map_state(job.state)
                if (job.state, job.reason) != last:
                    last = (job.state, job.reason)
                    seen = seen or status != QUEUED
                    if progress is not None:
                        await progress(status, _waiting(job) if status == QUEUED else None)
                    interval = POLL_MIN_SECONDS
                if job.state.split()[0] in ENDED:
                    return await self._result(handle, job.state.split()[0])
                await trio.sleep(interval)
                interval = min(interval * 1.5, POLL_MAX_SECONDS)
        finally:
            self._squeue.unwatch(job_id)

    async def _exit_status(self, handle: SlurmHandle, wait: float) -> str | None:
        path = Path(handle.run_dir) / EXIT_FILE
        with trio.move_on_after(wait):
            while True:
                text = read_status_file(path)
                if text is not None:
                    return text
                await trio.sleep(0.1)
        return None

    async def _result(self, handle: SlurmHandle, state: str) -> ExitResult:
        status, reason = map_state(state)
        code, signal = parse_exit_status(await self._exit_status(
            handle, EXIT_FILE_WAIT_SECONDS if state in ("COMPLETED", "FAILED") else 0))
        ran = code is not None or signal is not None
        if status == COMPLETED:
            return ExitResult(exit_code=0 if code is None else code, signal=signal, started=True)
        if reason == "memory_limit_exceeded":
            return ExitResult(exit_code=code, signal=signal, memory_exceeded=True, started=True)
        if status == FAILED and reason == "exit_code":
            if ran:
                return ExitResult(exit_code=code, signal=signal, started=True)
            return ExitResult(status=FAILED, reason="slurm_failed", started=False,
                              error="the Slurm job failed before the run's command ended (see user_logs/std_log.txt)")
        return ExitResult(exit_code=code, signal=signal, status=status, reason=reason, error=state_error(reason),
                          started=ran)

    async def _ended_unseen(self, handle: SlurmHandle, seen: bool) -> ExitResult:
        """The job left squeue: its recorded exit status, else what sacct knows, else it is lost."""
        text = await self._exit_status(handle, EXIT_FILE_WAIT_SECONDS)
        if text is not None:
            code, signal = parse_exit_status(text)
            return ExitResult(exit_code=code, signal=signal, started=True)
        state = await self._sacct_state(handle.job_id)
        if state is not None and state in ENDED:
            return await self._result(handle, state)
        return ExitResult(status=FAILED, reason="slurm_job_lost", started=seen,
                          error=f"Slurm job {handle.job_id} is gone and left no exit status")

    async def _sacct_state(self, job_id: str) -> str | None:
        try:
            result = await self._run([_command("sacct"), "--noheader", "--parsable2", "--allocations",
                                      f"--jobs={job_id}", "--format=State"], None)
        except (OSError, trio.TooSlowError):
            return None
        lines = result.stdout.decode(errors="replace").split()
        return lines[0].split()[0] if result.returncode == 0 and lines else None

    def stopping_together(self, handles: list[Handle]) -> None:
        """An array canceled as a whole: its job array is stopped with one ``scancel`` of the array's id."""
        by_array: dict[str, list[SlurmHandle]] = {}
        for handle in handles:
            if handle.array_job is not None:
                by_array.setdefault(handle.array_job, []).append(handle)
        for array_job, members in by_array.items():
            self._array_stops.setdefault(array_job, _ArrayStop(members))

    async def stop(self, handle: SlurmHandle, grace: float) -> None:
        """SIGTERM to the run's processes, ``grace`` seconds, then SIGKILL; a pending job just leaves the queue."""
        together = self._array_stops.get(handle.array_job) if handle.array_job is not None else None
        if together is None or handle not in together.handles:
            await self._stop_job(handle.job_id, [handle], grace)
        elif together.done is None:
            together.done = trio.Event()
            try:
                await self._stop_job(handle.array_job, together.handles, grace)
            finally:
                together.done.set()
                del self._array_stops[handle.array_job]
        else:
            await together.done.wait()

    async def _stop_job(self, job_id: str, handles: list[SlurmHandle], grace: float) -> None:
        """Stop ``job_id`` (a job, an array task, or a whole job array), whose runs are ``handles``."""
        scancel = _command("scancel")
        owner = handles[0]
        try:
            states = await self._squeue.states_of([h.job_id for h in handles])
        except SlurmUnavailable:
            states = [None] * len(handles)
        if all(job is not None and job.state.split()[0] in ENDED for job in states):
            return
        running = [h for h, job in zip(handles, states) if job is not None and map_state(job.state)[0] != QUEUED
                   and job.state.split()[0] not in ENDED]
        if running:
            if len(handles) > 1:
                # The array's pending tasks go first: none may start in the place of a stopped one.
                await self._scancel([scancel, "--state=PENDING", job_id], owner)
            # The batch script passes SIGTERM on to the command's processes, and SIGKILL after the grace period.
            await self._scancel([scancel, "--signal=TERM", "--batch", job_id], owner)
            with trio.move_on_after(grace + SCRIPT_KILL_MARGIN_SECONDS):
                for h in running:
                    await self._exit_status(h, math.inf)
            recorded = all(read_status_file(Path(h.run_dir) / EXIT_FILE) is not None for h in running)
            if recorded and len(handles) == 1:
                return
        # What is left of the job ends now: a command that outlived the grace period, or of a job array, also a
        # task that started between the look at its states and the cancel of its pending tasks.
        await self._scancel([scancel, job_id], owner)

    async def _scancel(self, argv: list[str], handle: SlurmHandle) -> None:
        try:
            result = await self._run(argv, handle)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("slurm.scancel.failed", job_id=argv[-1], error=str(exc))
            return
        log.info("slurm.scancel", job_id=argv[-1], argv=argv[1:], exit_code=result.returncode,
                 error=result.stderr.decode(errors="replace").strip() or None)

    async def recover(self, handle: SlurmHandle) -> Recovery:
        """A lookup by job id: still in Slurm (pending or running), ended with its exit status, or gone."""
        try:
            job = await self._squeue.state_of(handle.job_id)
        except SlurmUnavailable as exc:
            log.warning("slurm.unavailable", job_id=handle.job_id, error=str(exc))
            return Live(handle)   # wait() keeps asking, with backoff
        if job is None:
            result = await self._ended_unseen(handle, seen=True)
            return Lost(result.error) if result.reason == "slurm_job_lost" else Ended(result)
        if job.state.split()[0] in ENDED:
            return Ended(await self._result(handle, job.state.split()[0]))
        return Live(handle)
